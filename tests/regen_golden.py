"""Regenerate the golden tables tests/golden/{summary,ode_vs_quality,ode_vs_quality_verdicts}_golden.* after an
intended change of the tables (or of the paper numbers they show):

    python tests/regen_golden.py

then review `git diff tests/golden` before committing. tests/test_report.py::test_golden only ever compares."""
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
FIXTURES = sorted((GOLDEN / "records").glob("*.json"))
PAPER_NUMBERS = REPO / "configs" / "paper_numbers.yaml"
TABLES = ["summary_golden.csv", "summary_golden.md", "summary_golden.tex", "ode_vs_quality_golden.csv",
          "ode_vs_quality_golden.md", "ode_vs_quality_golden.tex", "ode_vs_quality_verdicts_golden.csv"]


def render(out: Path) -> None:
    """The tables of suite `golden` from the fixture records, as the report writes them, into out."""
    from cmbench.report import build, papers, records

    build.write_tables(records.load_records(FIXTURES), "golden", out,
                       papers.primary_numbers(papers.load_paper_numbers(PAPER_NUMBERS)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        render(Path(tmp))
        for name in TABLES:
            (GOLDEN / name).write_bytes((Path(tmp) / name).read_bytes())
            print(GOLDEN / name)


if __name__ == "__main__":
    main()
