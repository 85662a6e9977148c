"""`icd eval`'s library: editing benchmarks read from the user's own copy (PIE-Bench, the iCD authors' CSVs, a
folder with metadata.jsonl), their metrics, and the results, tables and pictures a run writes. It runs no
model of its own (the app edits through a runner) and ships no benchmark file."""
