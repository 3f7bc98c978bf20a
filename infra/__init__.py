"""Infrastructure of fedcompare: the checkpoint store and the local stack launcher."""
