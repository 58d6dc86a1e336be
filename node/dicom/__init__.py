"""The DICOM network layer both the acceptor (receive) and the requestor (send) stand on.

PDUs (:mod:`.pdu`), association negotiation (:mod:`.association`), DIMSE command sets (:mod:`.dimse`),
status meanings (:mod:`.status`) and the node's DICOM identity (:mod:`.identity`). This package
imports nothing from the rest of the node.
"""
