"""Metering: the notebook's holds (:mod:`.meter`), the settlement the scheduler plugin drives, and its reports to the credit service."""
