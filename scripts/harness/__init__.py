"""What the fault runner (scripts/faults.py), `make up` (scripts/run_system.py) and the benchmark
(benchmarks/pipeline.py) share, one concern a module:

- `processes`: start, kill, stop and restart a service's process (or its replicas) with a log
  file each; wait until they answer ready, failing with the log's tail and the exit status;
- `balancer`: one address in front of a service's replicas, as a Kubernetes Service is;
- `sinks`: the mail sink and the webhook receiver, each journaling what it receives to a file;
- `monitor`: the pipeline's counters, sampled from the services' databases and the journals;
- `workload`: the learners and the partner institution (enrollments, payments, signed reports);
- `accounting`: the final accounting from the databases, journals and dead-letter topics, and
  the result it renders;
- `cluster`: a local multi-broker KRaft Kafka cluster.

The package sits in `scripts/`; the tools put that folder on `sys.path` and import `harness.<module>`.
"""
