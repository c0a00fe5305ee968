"""The command line and what it needs (a zoo of models to name, spawned ranks, reports). Never imported by the
library."""
