"""Apply and export: the only code that knows runtimes' config formats."""
