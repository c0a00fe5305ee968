"""How ranks exchange tensors: shared memory between ranks on one host (``shm``), and reused output buffers."""
