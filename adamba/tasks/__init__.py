"""Chat tasks: conversations to fine-tune on and items to evaluate (base.py has the protocol; mixtures.py names
the sets the CLI and the demo use)."""
