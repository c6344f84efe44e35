// Package announce makes a guest reachable again after a fault-tolerance
// failover. When the backup VMM goes live its guest's frames leave through a
// different host port, so switches and bridges still forward to the old one
// and neighbours may still hold stale cache entries. The new primary
// therefore sends, once or a few times, the frames QEMU's announce-self
// sends plus their IPv6 counterpart: a RARP frame for the guest's MAC, a
// gratuitous ARP request per IPv4 address and an unsolicited Neighbor
// Advertisement (Override set) per IPv6 address, link-local included.
//
// The guest's addresses are not configured on the host; a Learner finds them
// by snooping the frames the guest itself transmits (its ARP traffic and the
// source addresses of its IPv6 packets). The guest is untrusted: Observe
// accepts arbitrary bytes, keeps a bounded number of addresses and never
// learns one that Frames would refuse to announce.
//
// Frames are built and parsed with gVisor's tcpip/header package and are
// complete Ethernet frames without FCS, padded to the 60-byte minimum.
package announce
