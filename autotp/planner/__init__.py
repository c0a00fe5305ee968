"""Planner: captured graph -> Plan. Pure: reads the graph, never touches weights, processes or modules.

``sites`` finds linear layers and lookups, ``propagate`` pushes layouts through the per-op ``rules``, ``groups``
pairs column and row layers, ``check`` proves a plan passed in, ``explain`` words the failures."""
