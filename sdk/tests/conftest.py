pytest_plugins = ["streamspace_sdk.testing.plugin"]
