"""The typer layer: one module per command; ``app.py`` wires them. No logic lives here."""
