"""Datasets, class splits, episode sampling, classifiers, reports and performance benchmarks."""
