-- Are-We-Fast-Yet: Richards, transcribed from examples/lang/tests/awfy/richards.lang.
-- An operating-system scheduler simulation: six tasks with task control blocks, packets
-- and packet queues. Verification: queuePacketCount == 23246 and holdCount == 9297.
-- Usage: lua richards.lua [ITERATIONS]
--
-- Differences from the lang port, all for Lua's 1-based arrays or syntax:
-- - task identities are 1..6 (0..5 there), so task_table[identity] stays direct;
-- - a packet's datum counts 1..DATA_SIZE (0..DATA_SIZE-1 there), so data[count] stays
--   direct; the test `count >= DATA_SIZE` becomes `count > DATA_SIZE`;
-- - the field `function` (a Lua keyword) is `func`;
-- - integer division of non-negative values is floor(a / 2) (LuaJIT has no `//`);
-- - like the lang port, exclusive or is a bit-by-bit loop, not a bitwise operator.
local iterations = tonumber(arg and arg[1]) or 1
local floor = math.floor

local IDLER = 1
local WORKER = 2
local HANDLER_A = 3
local HANDLER_B = 4
local DEVICE_A = 5
local DEVICE_B = 6
local NUM_TYPES = 6
local DEVICE_PACKET_KIND = 0
local WORK_PACKET_KIND = 1
local DATA_SIZE = 4

local function new_array(n, init)
  local a = {}
  for i = 1, n do a[i] = init end
  return a
end

local function xor(a, b)
  local result = 0
  local bit = 1
  while a ~= 0 or b ~= 0 do
    if a % 2 ~= b % 2 then result = result + bit end
    a = floor(a / 2)
    b = floor(b / 2)
    bit = bit * 2
  end
  return result
end

local function append(packet, queue_head)
  packet.link = nil
  if queue_head == nil then return packet end
  local mouse = queue_head
  local link = mouse.link
  while link ~= nil do
    mouse = link
    link = mouse.link
  end
  mouse.link = packet
  return queue_head
end

-- --- Packet ---
local function new_packet(link, identity, kind)
  return {link = link, identity = identity, kind = kind, datum = 1,
          data = new_array(DATA_SIZE, 0)}
end

-- --- Task data records ---
local function new_device_task_data_record() return {pending = nil} end

local function handler_device_in_add(self, packet) self.device_in = append(packet, self.device_in) end
local function handler_work_in_add(self, packet) self.work_in = append(packet, self.work_in) end
local function new_handler_task_data_record()
  return {work_in = nil, device_in = nil,
          device_in_add = handler_device_in_add, work_in_add = handler_work_in_add}
end

local function new_idle_task_data_record() return {control = 1, count = 10000} end

local function new_worker_task_data_record() return {destination = HANDLER_A, count = 0} end

-- --- TaskState ---
local function ts_packet_pending(self)
  self.packet_pending = true
  self.task_waiting = false
  self.task_holding = false
end
local function ts_running(self)
  self.packet_pending = false
  self.task_waiting = false
  self.task_holding = false
end
local function ts_waiting(self)
  self.packet_pending = false
  self.task_holding = false
  self.task_waiting = true
end
local function ts_waiting_with_packet(self)
  self.task_holding = false
  self.task_waiting = true
  self.packet_pending = true
end
local function ts_is_running(self)
  return not self.packet_pending and not self.task_waiting and not self.task_holding
end
local function ts_is_task_holding_or_waiting(self)
  return self.task_holding or (not self.packet_pending and self.task_waiting)
end
local function ts_is_waiting(self)
  return not self.packet_pending and self.task_waiting and not self.task_holding
end
local function ts_is_waiting_with_packet(self)
  return self.packet_pending and self.task_waiting and not self.task_holding
end

local function new_task_state()
  return {packet_pending = true, task_waiting = false, task_holding = false,
          packet_pending_ = ts_packet_pending, running = ts_running, waiting = ts_waiting,
          waiting_with_packet = ts_waiting_with_packet}
end
local function create_running() local s = new_task_state(); s:running(); return s end
local function create_waiting() local s = new_task_state(); s:waiting(); return s end
local function create_waiting_with_packet() local s = new_task_state(); s:waiting_with_packet(); return s end

-- --- TaskControlBlock ---
local function tcb_add_input_and_check_priority(self, packet, old_task)
  if self.input == nil then
    self.input = packet
    self.packet_pending = true
    if self.priority > old_task.priority then return self end
  else
    self.input = append(packet, self.input)
  end
  return old_task
end

local function tcb_run_task(self)
  local message = nil
  if self:is_waiting_with_packet() then
    message = self.input
    self.input = message.link
    if self.input == nil then
      self:running()
    else
      self:packet_pending_()
    end
  else
    message = nil
  end
  return self.func:apply(message, self.handle)
end

local function new_task_control_block(link, identity, priority, initial_work_queue, initial_state,
                                      func, private_data)
  return {link = link, identity = identity, priority = priority, input = initial_work_queue,
          packet_pending = initial_state.packet_pending,
          task_waiting = initial_state.task_waiting,
          task_holding = initial_state.task_holding,
          func = func, handle = private_data,
          packet_pending_ = ts_packet_pending, running = ts_running, waiting = ts_waiting,
          waiting_with_packet = ts_waiting_with_packet, is_running = ts_is_running,
          is_task_holding_or_waiting = ts_is_task_holding_or_waiting,
          is_waiting = ts_is_waiting, is_waiting_with_packet = ts_is_waiting_with_packet,
          add_input_and_check_priority = tcb_add_input_and_check_priority,
          run_task = tcb_run_task}
end

-- --- Task bodies (the suite's lambdas; objects holding the scheduler, as in the lang port) ---
local function device_apply(self, work, word)
  local s = self.scheduler
  local function_work = work
  local data_record = word
  if function_work == nil then
    function_work = data_record.pending
    if function_work == nil then
      return s:mark_waiting()
    end
    data_record.pending = nil
    return s:queue_packet(function_work)
  end
  data_record.pending = function_work
  return s:hold_self()
end

local function handler_apply(self, work, word)
  local s = self.scheduler
  local data_record = word
  if work ~= nil then
    if work.kind == WORK_PACKET_KIND then
      data_record:work_in_add(work)
    else
      data_record:device_in_add(work)
    end
  end
  local work_packet = data_record.work_in
  if work_packet == nil then
    return s:mark_waiting()
  end
  local count = work_packet.datum
  if count > DATA_SIZE then
    data_record.work_in = work_packet.link
    return s:queue_packet(work_packet)
  end
  local device_packet = data_record.device_in
  if device_packet == nil then
    return s:mark_waiting()
  end
  data_record.device_in = device_packet.link
  device_packet.datum = work_packet.data[count]
  work_packet.datum = count + 1
  return s:queue_packet(device_packet)
end

local function idler_apply(self, work, word)
  local s = self.scheduler
  local data_record = word
  data_record.count = data_record.count - 1
  if data_record.count == 0 then
    return s:hold_self()
  end
  if data_record.control % 2 == 0 then
    data_record.control = floor(data_record.control / 2)
    return s:release(DEVICE_A)
  end
  data_record.control = xor(floor(data_record.control / 2), 53256)
  return s:release(DEVICE_B)
end

local function worker_apply(self, work, word)
  local s = self.scheduler
  local data = word
  if work == nil then
    return s:mark_waiting()
  end
  if data.destination == HANDLER_A then
    data.destination = HANDLER_B
  else
    data.destination = HANDLER_A
  end
  work.identity = data.destination
  work.datum = 1
  local i = 1
  while i <= DATA_SIZE do
    data.count = data.count + 1
    if data.count > 26 then data.count = 1 end
    work.data[i] = 65 + data.count - 1
    i = i + 1
  end
  return s:queue_packet(work)
end

-- --- Scheduler ---
local function sched_create_task(self, identity, priority, work, state, func, data)
  local t = new_task_control_block(self.task_list, identity, priority, work, state,
                                   func, data)
  self.task_list = t
  self.task_table[identity] = t
end

local function sched_create_device(self, identity, priority, work_packet, state)
  local data = new_device_task_data_record()
  self:create_task(identity, priority, work_packet, state,
                   {scheduler = self, apply = device_apply}, data)
end

local function sched_create_handler(self, identity, priority, work_packet, state)
  local data = new_handler_task_data_record()
  self:create_task(identity, priority, work_packet, state,
                   {scheduler = self, apply = handler_apply}, data)
end

local function sched_create_idler(self, identity, priority, work, state)
  local data = new_idle_task_data_record()
  self:create_task(identity, priority, work, state,
                   {scheduler = self, apply = idler_apply}, data)
end

local function sched_create_worker(self, identity, priority, work_packet, state)
  local data = new_worker_task_data_record()
  self:create_task(identity, priority, work_packet, state,
                   {scheduler = self, apply = worker_apply}, data)
end

local function sched_create_packet(self, link, identity, kind)
  return new_packet(link, identity, kind)
end

-- The lang port prints -1 and stops; here error() stops the program (exit code 1).
local function sched_find_task(self, identity)
  local t = self.task_table[identity]
  if t == nil then
    print(-1)
    error("richards: findTask failed")
  end
  return t
end

local function sched_hold_self(self)
  self.hold_count = self.hold_count + 1
  self.current_task.task_holding = true
  return self.current_task.link
end

local function sched_queue_packet(self, packet)
  local t = self:find_task(packet.identity)
  if t == nil then return nil end
  self.queue_packet_count = self.queue_packet_count + 1
  packet.link = nil
  packet.identity = self.current_task_identity
  return t:add_input_and_check_priority(packet, self.current_task)
end

local function sched_release(self, identity)
  local t = self:find_task(identity)
  if t == nil then return nil end
  t.task_holding = false
  if t.priority > self.current_task.priority then return t end
  return self.current_task
end

local function sched_mark_waiting(self)
  self.current_task.task_waiting = true
  return self.current_task
end

local function sched_schedule(self)
  self.current_task = self.task_list
  while self.current_task ~= nil do
    if self.current_task:is_task_holding_or_waiting() then
      self.current_task = self.current_task.link
    else
      self.current_task_identity = self.current_task.identity
      self.current_task = self.current_task:run_task()
    end
  end
end

local function sched_start(self)
  self:create_idler(IDLER, 0, nil, create_running())
  local work_q = self:create_packet(nil, WORKER, WORK_PACKET_KIND)
  work_q = self:create_packet(work_q, WORKER, WORK_PACKET_KIND)
  self:create_worker(WORKER, 1000, work_q, create_waiting_with_packet())

  work_q = self:create_packet(nil, DEVICE_A, DEVICE_PACKET_KIND)
  work_q = self:create_packet(work_q, DEVICE_A, DEVICE_PACKET_KIND)
  work_q = self:create_packet(work_q, DEVICE_A, DEVICE_PACKET_KIND)
  self:create_handler(HANDLER_A, 2000, work_q, create_waiting_with_packet())

  work_q = self:create_packet(nil, DEVICE_B, DEVICE_PACKET_KIND)
  work_q = self:create_packet(work_q, DEVICE_B, DEVICE_PACKET_KIND)
  work_q = self:create_packet(work_q, DEVICE_B, DEVICE_PACKET_KIND)
  self:create_handler(HANDLER_B, 3000, work_q, create_waiting_with_packet())

  self:create_device(DEVICE_A, 4000, nil, create_waiting())
  self:create_device(DEVICE_B, 5000, nil, create_waiting())

  self:schedule()
  return self.queue_packet_count == 23246 and self.hold_count == 9297
end

local function new_scheduler()
  -- array(NUM_TYPES) of nils: an empty table in Lua (every slot is set by create_task)
  return {task_list = nil, current_task = nil, current_task_identity = 0,
          task_table = {}, queue_packet_count = 0, hold_count = 0,
          create_task = sched_create_task, create_device = sched_create_device,
          create_handler = sched_create_handler, create_idler = sched_create_idler,
          create_worker = sched_create_worker, create_packet = sched_create_packet,
          find_task = sched_find_task, hold_self = sched_hold_self,
          queue_packet = sched_queue_packet, release = sched_release,
          mark_waiting = sched_mark_waiting, schedule = sched_schedule,
          start = sched_start}
end

local function benchmark()
  local s = new_scheduler()
  s.ok = s:start()
  return s
end

local function verify(s) return s.ok end

local run = 0
local last = nil
local ok = true
while run < iterations do
  last = benchmark()
  ok = ok and verify(last)
  run = run + 1
end
print(last.queue_packet_count)
print(last.hold_count)
print(ok and 1 or 0)
