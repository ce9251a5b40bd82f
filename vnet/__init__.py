"""The vnet agent (``tmdht vnet run``): carries VMs' Ethernet frames between hosts and keeps a
migrating VM's frames (see :mod:`tmdht.vswitch` for the logic, :mod:`tmdht.vnet.agent` for the
service)."""
