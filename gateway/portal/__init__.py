"""The secure portal: messages picked up over HTTPS after proving the address."""
