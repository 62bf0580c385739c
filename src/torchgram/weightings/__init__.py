"""Weightings: plain functions from a Gramian to the weights of the Jacobian's rows."""

__all__: list[str] = []
