-- Are-We-Fast-Yet: Bounce, transcribed from examples/lang/tests/awfy/bounce.lang.
-- 100 balls bounce in a 500 x 500 box for 50 steps; counts the bounces (1331).
-- Usage: lua bounce.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

-- The suite's generator: (seed * 1309 + 13849) & 65535; as in the lang port, % 65536
-- (the value is never negative).
local function random_next(self)
  self.seed = (self.seed * 1309 + 13849) % 65536
  return self.seed
end
local function new_random() return {seed = 74755, next = random_next} end

local function abs(v)
  if v < 0 then return -v end
  return v
end

local function ball_bounce(self)
  local x_limit = 500
  local y_limit = 500
  local bounced = false
  self.x = self.x + self.x_vel
  self.y = self.y + self.y_vel
  if self.x > x_limit then
    self.x = x_limit
    self.x_vel = -abs(self.x_vel)
    bounced = true
  end
  if self.x < 0 then
    self.x = 0
    self.x_vel = abs(self.x_vel)
    bounced = true
  end
  if self.y > y_limit then
    self.y = y_limit
    self.y_vel = -abs(self.y_vel)
    bounced = true
  end
  if self.y < 0 then
    self.y = 0
    self.y_vel = abs(self.y_vel)
    bounced = true
  end
  return bounced
end

local function new_ball(random)
  local x = random:next() % 500
  local y = random:next() % 500
  local x_vel = random:next() % 300 - 150
  local y_vel = random:next() % 300 - 150
  return {x = x, y = y, x_vel = x_vel, y_vel = y_vel, bounce = ball_bounce}
end

local function benchmark()
  local random = new_random()
  local ball_count = 100
  local bounces = 0
  -- array(ball_count): the balls are 1..ball_count here (0-based in the lang port)
  local balls = {}
  local i = 1
  while i <= ball_count do
    balls[i] = new_ball(random)
    i = i + 1
  end
  i = 0
  while i < 50 do
    local b = 1
    while b <= ball_count do
      if balls[b]:bounce() then
        bounces = bounces + 1
      end
      b = b + 1
    end
    i = i + 1
  end
  return bounces
end

local function verify(result) return result == 1331 end

local run = 0
local last = 0
local ok = true
while run < iterations do
  last = benchmark()
  ok = ok and verify(last)
  run = run + 1
end
print(last)
print(ok and 1 or 0)
