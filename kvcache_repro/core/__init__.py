"""The bottom layer: what every other layer may use and which uses none of them (atomic
writes, the command-line help, the machine and package versions a number is recorded with)."""
