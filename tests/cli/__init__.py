"""The command line: real processes, bad input and exit statuses, the documented commands, the demo, repair, diagnose."""
