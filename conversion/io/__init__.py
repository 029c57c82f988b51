"""Reading checkpoint bytes safely: the one bounded unpickler (`safe_pickle`) and the tensor
handles it builds (`handles`).  Nothing here imports torch."""
