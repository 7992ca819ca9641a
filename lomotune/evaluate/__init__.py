"""Evaluation: exact match by greedy generation (exact_match.py, used while training),
and SuperGLUE by log-likelihood (`lomotune eval`): superglue/ (one module per task:
readers, prompts, choices), reading.py (official and hub layouts), scoring.py (batched,
shared-context log-likelihoods), metrics.py, run.py (one task end to end),
lomo_protocol.py (the LOMO paper's setup), command.py (the CLI's flow)."""
