"""The `lora-mixer` command line and what only it uses: routing inspection, plots and the demo."""
