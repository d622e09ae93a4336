"""Serving: load a trained model (loader), talk to it (chat), and the terminal front end (cli)."""
