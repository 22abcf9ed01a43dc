"""A package so that its conftest is imported as tests_published.conftest: a bare `conftest` module would shadow
tests/conftest.py (which tests import from) when both folders run in one pytest call."""
