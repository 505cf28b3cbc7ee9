"""The policy engine: the language, the classifiers and the decision."""
