"""Training a prepared model: QAD's distiller (`distill`), the training loop (`train`),
FSDP2 sharding (`distributed`) and checkpoints (`checkpoint`)."""
