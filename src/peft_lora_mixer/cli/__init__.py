"""The `lora-mixer` command line and what only it uses: data reading and plots."""
