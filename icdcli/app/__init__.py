"""The app: the `icd` command line, the sessions it opens, file jobs, the demo and `icd bench`."""
