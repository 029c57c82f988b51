"""Reading and writing files: the readers, the safetensors header, the streamed path, the writers, faults while writing, progress."""
