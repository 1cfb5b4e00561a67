"""Running the memory experiment: scenarios, one fresh worker per row, rows kept through interruptions, time limits, the printed table and its files."""
