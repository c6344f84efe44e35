package boot

import "encoding/binary"

// The MP table (Intel MultiProcessor Specification 1.4): a floating pointer
// in the last KiB of base memory, then a configuration table with the one
// processor and an ISA bus. PC firmware provides one; without it Linux
// looks for the floating pointer in 16-byte steps through the first KiB,
// the last KiB of base memory and all 64 KiB of the BIOS area, remapping
// the rest of the area at every step (smp_scan_config), which took 2.3 s
// of emulated kernel time at boot on the lab host. The processor entry
// names local APIC 0, as the specification requires; a guest told
// `nolapic` ignores it. There are no I/O APIC or interrupt entries: the
// interrupt controller is the 8259 pair.
const (
	mpFloatAddr  = ebdaStart // the last KiB of base memory, reserved in the e820 map
	mpConfigAddr = mpFloatAddr + mpFloatLen
	mpFloatLen   = 16
	mpHeaderLen  = 44
	mpProcLen    = 20
	mpBusLen     = 8
	mpSpecRev    = 4 // version 1.4
	mpLAPICAddr  = 0xfee00000
)

// mpTables returns the floating pointer and the configuration table, each
// with its checksum, for mpFloatAddr.
func mpTables() (float, config []byte) {
	le := binary.LittleEndian
	config = make([]byte, mpHeaderLen+mpProcLen+mpBusLen)
	copy(config, "PCMP")
	le.PutUint16(config[4:], uint16(len(config)))
	config[6] = mpSpecRev
	copy(config[8:16], "GOKVMFT ")
	copy(config[16:28], "PC          ")
	le.PutUint16(config[34:], 2) // entries
	le.PutUint32(config[36:], mpLAPICAddr)
	p := config[mpHeaderLen:]
	p[0] = 0    // processor
	p[1] = 0    // local APIC ID
	p[2] = 0x14 // local APIC version (integrated)
	p[3] = 3    // enabled, bootstrap processor
	b := p[mpProcLen:]
	b[0] = 1 // bus
	b[1] = 0 // bus ID
	copy(b[2:8], "ISA   ")
	config[7] = checksum(config)

	float = make([]byte, mpFloatLen)
	copy(float, "_MP_")
	le.PutUint32(float[4:], mpConfigAddr)
	float[8] = 1 // length in 16-byte units
	float[9] = mpSpecRev
	// Feature bytes 0: the configuration table above, virtual wire mode.
	float[10] = checksum(float)
	return float, config
}

// checksum is the byte that makes b's bytes sum to 0 (mod 256), given
// that b's checksum byte is still 0.
func checksum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return -s
}

// writeMPTables puts the MP tables into guest memory.
func writeMPTables(mem Memory) error {
	float, config := mpTables()
	if err := mem.WriteAt(float, mpFloatAddr); err != nil {
		return err
	}
	return mem.WriteAt(config, mpConfigAddr)
}
