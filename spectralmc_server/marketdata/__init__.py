"""Market data: typed objects, immutable snapshots keyed by (namespace, val_datetime,
data_asof), and the inputs a contract by reference takes from one."""
