"""rvr-serve HTTP API, job queues and the continuous-batching GPU worker.

Importing this package never imports torch or `engine`: only `server.worker` does, lazily.
"""

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    # Lazy so `import server.settings` stays light (the CLI's --help, the README table).
    if name == "Settings":
        from server.settings import Settings

        return Settings
    if name == "create_app":
        from server.app import create_app

        return create_app
    raise AttributeError(name)
