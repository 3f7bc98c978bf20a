"""The `fedcompare` command line: the local stack, the demo, reports, serving and a real deployment's parts."""
