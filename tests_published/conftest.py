"""Tests against IFEval's published GPT-4 data, which the repository does not ship (see the README for where it is).

Plain ``pytest`` collects only ``tests/`` and needs nothing outside the repository; these run on request:
``pytest tests_published --ifeval-data DIR``. Without the option, or with a DIR lacking the files, every test
here fails (not skips): asked for, a published-number check that silently did not run would read as a pass.
"""

from pathlib import Path

import pytest

FILES = {
    "inputs": "input_data_gpt4_20231107_145030.jsonl",
    "responses": "input_response_data_gpt4_20231107_145030.jsonl",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--ifeval-data",
        metavar="DIR",
        help=f"folder with IFEval's published {FILES['inputs']} and {FILES['responses']} (for tests_published/)",
    )


@pytest.fixture(scope="session")
def ifeval_data(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Paths of the published inputs and GPT-4 responses, from ``--ifeval-data``."""
    folder = request.config.getoption("--ifeval-data")
    if not folder:
        pytest.fail(
            "tests_published needs IFEval's published data: run `pytest tests_published --ifeval-data DIR`.",
            pytrace=False,
        )
    paths = {k: Path(folder) / name for k, name in FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.fail(f"--ifeval-data {folder}: missing {', '.join(missing)}.", pytrace=False)
    return paths
