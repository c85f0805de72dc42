"""The ``t2iroute`` command line: one module per command group."""
