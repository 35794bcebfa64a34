"""One module per ``python -m data_prep`` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``."""
