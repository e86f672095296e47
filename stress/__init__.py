"""Fault-injection measurements and (later) the churn stress harness."""
