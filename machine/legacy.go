package machine

// Small legacy devices: the i8042 controller (for its reset line), system
// control port A (0x92), the reset control register (0xCF9), POST/delay
// ports and the test-exit port. None of them reads the host.

// Port numbers of the PC legacy devices.
const (
	portI8042Data   = 0x60
	portI8042Cmd    = 0x64
	portSysCtrlA    = 0x92
	portResetCtrl   = 0xcf9
	portPOST        = 0x80
	portDelay       = 0xed
	PortTestExit    = 0x501 // write v: the machine stops with StopTestExit and code v
	i8042StatusOBF  = 0x01  // output buffer full
	i8042StatusSys  = 0x04  // system flag: POST passed
	i8042CmdReadCB  = 0x20
	i8042CmdWriteCB = 0x60
	i8042CmdSelf    = 0xaa
	i8042CmdKbdTest = 0xab
	i8042CmdAuxTest = 0xa9
	i8042CmdReset   = 0xfe
)

// I8042State is the guest-visible state of the i8042.
type I8042State struct {
	CommandByte uint8
	Output      uint8
	OutputFull  bool
	Pending     uint8 // command awaiting a data byte, 0 if none
}

// i8042 models just enough of the keyboard controller for an OS to find it
// and to reset the machine through it (command 0xFE). No keyboard or mouse
// is attached: bytes sent to the devices get no answer.
type i8042 struct {
	s     I8042State
	reset func(why string)
}

func (k *i8042) ReadPort(port uint16, data []byte) {
	fillOnes(data)
	switch port {
	case portI8042Data:
		data[0] = k.s.Output
		k.s.OutputFull = false
	case portI8042Cmd:
		st := uint8(i8042StatusSys)
		if k.s.OutputFull {
			st |= i8042StatusOBF
		}
		data[0] = st
	}
}

func (k *i8042) reply(v uint8) { k.s.Output, k.s.OutputFull = v, true }

func (k *i8042) WritePort(port uint16, data []byte) {
	v := data[0]
	switch port {
	case portI8042Data:
		if k.s.Pending == i8042CmdWriteCB {
			k.s.CommandByte = v
		}
		k.s.Pending = 0
	case portI8042Cmd:
		k.s.Pending = 0
		switch {
		case v == i8042CmdReadCB:
			k.reply(k.s.CommandByte)
		case v == i8042CmdWriteCB:
			k.s.Pending = v
		case v == i8042CmdSelf:
			k.reply(0x55)
		case v == i8042CmdKbdTest || v == i8042CmdAuxTest:
			k.reply(0x00)
		case v == i8042CmdReset || (v >= 0xf0 && v&1 == 0):
			// 0xF0-0xFF pulse output lines; bit 0 clear pulses the reset line.
			k.reset("i8042 reset command")
		}
	}
}

// sysCtrl is system control port A (0x92: bit 0 fast reset, bit 1 A20) and
// the reset control register (0xCF9: bit 2 with bit 1 or 3 resets).
type sysCtrl struct {
	portA uint8
	cf9   uint8
	reset func(why string)
}

func (s *sysCtrl) ReadPort(port uint16, data []byte) {
	fillOnes(data)
	switch port {
	case portSysCtrlA:
		data[0] = s.portA
	case portResetCtrl:
		data[0] = s.cf9
	}
}

func (s *sysCtrl) WritePort(port uint16, data []byte) {
	v := data[0]
	switch port {
	case portSysCtrlA:
		if v&1 != 0 && s.portA&1 == 0 {
			s.reset("fast reset via port 0x92")
		}
		s.portA = v & 0x02
	case portResetCtrl:
		if v&0x04 != 0 {
			s.reset("reset via port 0xcf9")
		}
		s.cf9 = v & 0x0a
	}
}

// sinkPort swallows writes and reads as all-ones: POST codes and the I/O
// delay ports that operating systems write to wait a little.
type sinkPort struct{}

func (sinkPort) ReadPort(port uint16, data []byte)  { fillOnes(data) }
func (sinkPort) WritePort(port uint16, data []byte) {}

// testExit stops the machine with a code: how test guests finish.
type testExit struct {
	exit func(code uint32)
}

func (t testExit) ReadPort(port uint16, data []byte) { fillOnes(data) }
func (t testExit) WritePort(port uint16, data []byte) {
	var code uint32
	for i, b := range data {
		code |= uint32(b) << (8 * i)
	}
	t.exit(code)
}
