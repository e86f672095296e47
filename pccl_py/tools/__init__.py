"""Tools built on the runtime: the all-reduce benchmark (`pccl bench`) and the network
namespaces with shaped links it and the tests use. May import any layer."""
