"""`make mutate`'s machinery, checked fast: the operators it tries, the tests it picks for
a line, and one real run over a small module whose mutants a test in the test process, a
test in a subprocess, or nobody catches."""

import json
import subprocess
import sys

from deploy.mutate import annotation_spans, in_spans, keeps, select_tests
from tests.mutation_sample import doubled
from tests.processes import REPO, run_module

SAMPLE = "tests/mutation_sample.py"


def test_sample_doubles():
    assert doubled(3) == 6
    assert doubled(None) == 0


def test_sample_is_large_in_a_subprocess():
    code = "from tests.mutation_sample import is_large; assert is_large(11) and not is_large(10)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_one_replacement_per_operator_site_and_the_comparison_boundaries_are_tried():
    assert keeps("core/ReplaceBinaryOperator_Add_Sub")
    assert not keeps("core/ReplaceBinaryOperator_Add_Mul")
    assert keeps("core/ReplaceComparisonOperator_Gt_GtE")
    assert keeps("core/ReplaceComparisonOperator_Gt_LtE")
    assert not keeps("core/ReplaceComparisonOperator_Gt_Eq")
    assert keeps("core/ReplaceUnaryOperator_Delete_Not")
    assert not keeps("core/ReplaceUnaryOperator_USub_Invert")
    assert keeps("core/NumberReplacer")
    assert keeps("core/ReplaceBreakWithContinue")
    assert not keeps("core/VariableInserter")


def test_a_mutant_inside_a_type_annotation_is_not_tried():
    source = "def f(x: int | None, *, y: str | None = None) -> int | None:\n    return x | 1\n"
    spans = annotation_spans(source)

    assert in_spans((1, 12), spans)  # x: int | None
    assert in_spans((1, 30), spans)  # y: str | None
    assert in_spans((1, 51), spans)  # -> int | None
    assert not in_spans((2, 13), spans)  # x | 1: the code


def test_a_line_gets_its_own_tests_first_then_the_files_whose_processes_ran_it():
    lines = {
        3: ["", "tests/a.py::test_one"],
        5: ["file:tests/b.py", "tests/a.py::test_two"],
        7: ["file:tests/b.py"],
        9: [""],  # run on import only
    }

    assert select_tests(lines, 3, 3) == ["tests/a.py::test_one"]
    assert select_tests(lines, 5, 7) == ["tests/a.py::test_two", "tests/b.py"]
    assert select_tests(lines, 9, 9) == [
        "tests/a.py::test_one",
        "tests/a.py::test_two",
        "tests/b.py",
    ]
    assert select_tests(lines, 11, 11) == []  # no test: the mutant survives, said so


def test_a_mutation_run_kills_what_a_test_or_a_subprocess_catches_and_lists_the_rest(tmp_path):
    explained = tmp_path / "equivalent.txt"
    explained.write_text(f"{SAMPLE} | core/ReplaceTrueWithFalse | return True | untested here\n")
    tests = [f"tests/test_mutation.py::{name}" for name in ("test_sample_doubles",)]
    tests.append("tests/test_mutation.py::test_sample_is_large_in_a_subprocess")

    result = run_module(
        "deploy.mutate",
        SAMPLE,
        "--workdir",
        str(tmp_path / "work"),
        "--equivalent",
        str(explained),
        "--tests",
        *tests,
        timeout=600,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    # doubled: `+` made `-`, `if amount` made `if not amount`, 0 made 1 or -1 (the
    # annotation's `|` is not tried);
    # is_large: `>` made `>=` or `<=`, 10 made 9 or 11 -- caught only because the
    # subprocess imports the mutated file; never_called: True made False, survives.
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| `{SAMPLE}"))
    assert row.split("|")[2:6] == [" 9 ", " 8 ", " 89% ", " 1 "], result.stdout
    coverage = json.loads((tmp_path / "work" / "map.json").read_text())[SAMPLE]
    assert coverage[str(10)] == ["file:tests/test_mutation.py"]  # is_large's body
