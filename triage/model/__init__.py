"""The language model as every stage that runs it sees it: chat format and label scoring, fast kernels, device set-up."""
