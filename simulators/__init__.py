"""Simulated PLCs of the reference line: physics, ground-truth dose, Modbus TCP servers.

Never imports the controller's control, dose or link code; only its configuration and
register codec, so that both sides read the one register map the same way.
"""
