"""The commands behind the CLI: convert, generate (and eval). They build engines and load
checkpoints, so they sit above every library package."""
