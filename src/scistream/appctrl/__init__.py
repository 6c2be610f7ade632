"""The application controller: announces an application's endpoints to its facility's
S2CS (the hello) and starts the application."""
from .controller import run_cons, run_prod

__all__ = ["run_cons", "run_prod"]
