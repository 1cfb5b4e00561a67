"""Measuring: exact peak bytes, cache bytes and their analytic model, accuracy, speed, the machine and the spread of numbers between machines."""
