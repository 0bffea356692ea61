"""Enable mtrremu's conformance suite (it runs on the strategies pyproject.toml names)."""

pytest_plugins = ["mtrremu.testing.conformance"]
