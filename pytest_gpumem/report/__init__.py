"""Reporters: pure functions from test results to lines or text; the plugin's hooks only write them."""
