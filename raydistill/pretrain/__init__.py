"""Single-process training of the models distillation starts from: the teacher and the classifier."""
