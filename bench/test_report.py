"""Unit tests of report.py: medians, spreads and ratios paired by run.
Run with `python3 -m unittest discover -s bench -p 'test_*.py'`."""

import unittest

import report


def sample(subject, run, value, base=None, measure="Encrypt p50", section="plugin"):
    return {"section": section, "measure": measure, "unit": "µs", "better": "lower",
            "subject": subject, "run": run, "value": value, "base": base}


class AggregateTest(unittest.TestCase):
    def test_medians_and_ratios_are_paired_by_run(self):
        samples = [
            sample("floor", 1, 10), sample("reference", 1, 40, base=10), sample("kubekms", 1, 20, base=10),
            sample("floor", 2, 20), sample("reference", 2, 60, base=20), sample("kubekms", 2, 60, base=20),
            sample("floor", 3, 30), sample("reference", 3, 90, base=30), sample("kubekms", 3, 30, base=30),
        ]
        [row] = report.aggregate(samples)
        self.assertEqual(row["baseline"], "floor")
        self.assertEqual(row["values"]["kubekms"]["median"], 30)
        self.assertEqual(row["values"]["floor"]["min"], 10)
        # Per-run ratios to the floor: 2, 3, 1 → median 2 (not 30 / 20).
        self.assertEqual(row["ratio_to_baseline"]["kubekms"]["median"], 2)
        # kubekms ÷ reference per run: 0.5, 1.0, 0.333 → median 0.5.
        self.assertAlmostEqual(row["kubekms_to_reference"]["median"], 0.5)
        self.assertAlmostEqual(row["kubekms_to_reference"]["min"], 1 / 3)

    def test_rows_keep_the_order_of_measurement(self):
        samples = [sample("kubekms", 1, 1, measure="b"), sample("kubekms", 1, 2, measure="a")]
        self.assertEqual([r["measure"] for r in report.aggregate(samples)], ["b", "a"])

    def test_sections_follow_the_given_order(self):
        samples = [sample("kubekms", 1, 1, section="memory"), sample("kubekms", 1, 1, section="plugin", measure="x"),
                   sample("kubekms", 1, 1, section="other")]
        rows = report.aggregate(samples, ("plugin", "memory"))
        self.assertEqual([r["section"] for r in rows], ["plugin", "memory", "other"])

    def test_two_baselines_in_a_row_are_refused(self):
        with self.assertRaises(ValueError):
            report.aggregate([sample("floor", 1, 1), sample("identity", 1, 1)])

    def test_markdown_shows_spread_ratio_and_missing_cells(self):
        samples = [sample("identity", r, v, section="API server") for r, v in ((1, 100), (2, 110), (3, 90))]
        samples += [sample("kubekms", r, v, base=b, section="API server")
                    for r, v, b in ((1, 50, 100), (2, 55, 110), (3, 45, 90))]
        text = report.markdown(report.aggregate(samples), {"mode": "test"})
        row = [line for line in text.splitlines() if line.startswith("| API server")][0]
        self.assertIn("identity: 100 ±10%", row)
        self.assertIn("50.0 ±10% (×0.50)", row)
        self.assertIn("| – |", row)  # no aesgcm, and no reference to compare with

    def test_single_run_has_no_spread(self):
        [row] = report.aggregate([sample("kubekms", 1, 5)])
        self.assertEqual(report.spread(row["values"]["kubekms"]), "")


if __name__ == "__main__":
    unittest.main()
