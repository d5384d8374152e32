"""An end-to-end miniature of the paper that runs offline in minutes: see `run.run_demo`."""
