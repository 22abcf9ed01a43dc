"""Model integrations: thin patches that call the pure method code in `unclutter.vmtc` / `unclutter.cmai`."""
